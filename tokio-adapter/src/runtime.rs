//! Runtime builders that follow the default manager's options: `implicit_transmit` (Go's
//! `EnableImplicitlyTransmitAsync`, also set by `CLOUDWEGO_SESSION_CONFIG_KEY=true`) installs
//! the implicit-mode hooks, and `gc_interval` becomes the interval at which ended sessions are
//! swept out of long-lived tasks (Go's GC interval).

use std::fmt;

use tokio::runtime::Builder;

/// Applies the default manager's options to `builder`: with `implicit_transmit`, installs
/// implicit sessions (sweeping ended sessions every `gc_interval`, if set). The options are
/// those [`init`](crate::init) (or `localsession_std::init_default_manager`) resolved —
/// including `CLOUDWEGO_SESSION_CONFIG_KEY` — so call it first; before any init, Go's defaults
/// apply and nothing is installed.
///
/// # Errors
/// [`ImplicitUnavailableError`] if the options ask for implicit transmission but this crate was
/// built without `--cfg tokio_unstable` (tokio's task hooks need it): rather than silently
/// running without inheritance.
///
/// # Examples
/// ```
/// let mut builder = tokio::runtime::Builder::new_current_thread();
/// // No init in this doctest: Go's defaults, implicit transmission off.
/// localsession_tokio::apply_manager_options(builder.enable_all()).unwrap();
/// let rt = builder.build().unwrap();
/// ```
pub fn apply_manager_options(builder: &mut Builder) -> Result<&mut Builder, ImplicitUnavailableError> {
    crate::probe::register();
    let opts = localsession_std::manager_options().unwrap_or_else(localsession_std::default_manager_options);
    if !opts.implicit_transmit {
        return Ok(builder);
    }
    #[cfg(tokio_unstable)]
    {
        let mut hooks = crate::ImplicitSessions::new();
        if let Some(interval) = opts.gc_interval {
            hooks = hooks.sweep_every(interval);
        }
        Ok(hooks.install(builder))
    }
    #[cfg(not(tokio_unstable))]
    {
        Err(ImplicitUnavailableError(()))
    }
}

/// A multi-thread runtime builder with all drivers enabled and the default manager's options
/// applied (see [`apply_manager_options`]).
///
/// # Errors
/// As [`apply_manager_options`].
///
/// # Examples
/// ```
/// let rt = localsession_tokio::runtime_builder().unwrap().worker_threads(2).build().unwrap();
/// assert_eq!(rt.block_on(async { 1 + 1 }), 2);
/// ```
pub fn runtime_builder() -> Result<Builder, ImplicitUnavailableError> {
    let mut builder = Builder::new_multi_thread();
    builder.enable_all();
    apply_manager_options(&mut builder)?;
    Ok(builder)
}

/// Implicit transmission was requested (`implicit_transmit`, e.g. by
/// `CLOUDWEGO_SESSION_CONFIG_KEY=true`) but `localsession-tokio` was built without
/// `--cfg tokio_unstable`, which tokio's task hooks require.
///
/// # Examples
/// ```
/// # #[cfg(not(tokio_unstable))] {
/// use localsession_core::config::ManagerOptions;
/// let opts = ManagerOptions { implicit_transmit: true, ..localsession_std::default_manager_options() };
/// localsession_tokio::init(opts).unwrap();
/// let err = localsession_tokio::runtime_builder().unwrap_err();
/// assert!(err.to_string().contains("--cfg tokio_unstable"));
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImplicitUnavailableError(());

impl fmt::Display for ImplicitUnavailableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "implicit session transmission was requested (implicit_transmit, e.g. \
             CLOUDWEGO_SESSION_CONFIG_KEY=true), but localsession-tokio was built without \
             RUSTFLAGS=\"--cfg tokio_unstable\", which tokio's task hooks need",
        )
    }
}

impl std::error::Error for ImplicitUnavailableError {}
