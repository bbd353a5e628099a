//! Test support shared by the bridge tests of the std, tokio and rayon adapters (included with
//! `#[path]`): a `tracing` layer that records every span's name and its parent's name, and a
//! writer that collects log lines.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use tracing::Subscriber;
use tracing::span::{Attributes, Id};
use tracing_subscriber::layer::{Context as LayerContext, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// (span name, parent name) of every span created in the process.
pub(crate) static PARENTS: Mutex<Vec<(&'static str, Option<&'static str>)>> = Mutex::new(Vec::new());

/// Records into [`PARENTS`].
pub(crate) struct Capture;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, _attrs: &Attributes<'_>, id: &Id, ctx: LayerContext<'_, S>) {
        let span = ctx.span(id).unwrap();
        PARENTS.lock().unwrap().push((span.name(), span.parent().map(|p| p.name())));
    }
}

/// Makes a registry with [`Capture`] the process's global subscriber (once per process).
pub(crate) fn install_capture() {
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Capture)).unwrap();
}

/// A `std::io::Write` that collects everything written to it, shareable between the subscriber
/// and the test.
#[derive(Clone, Default)]
pub(crate) struct Lines(pub(crate) Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
