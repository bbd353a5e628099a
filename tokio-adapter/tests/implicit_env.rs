//! `CLOUDWEGO_SESSION_CONFIG_KEY=true` (Go's implicit-transmission switch) drives the runtime
//! builder: with `--cfg tokio_unstable` a plain `tokio::spawn` inherits the session; without,
//! building the runtime is an error that says why. Its own process: it sets the environment
//! and initializes the default manager.
#![allow(missing_docs)]

use localsession_core::SessionMap;

#[test]
fn the_env_switch_drives_the_runtime_builder() {
    // SAFETY: the only test of this process; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("CLOUDWEGO_SESSION_CONFIG_KEY", "true,10,1s") };
    localsession_tokio::init(localsession_std::default_manager_options()).unwrap();
    let opts = localsession_std::manager_options().unwrap();
    assert!(opts.implicit_transmit);

    let built = localsession_tokio::runtime_builder();
    #[cfg(not(tokio_unstable))]
    {
        let err = built.unwrap_err();
        assert!(err.to_string().contains("--cfg tokio_unstable"), "{err}");
        let _ = SessionMap::new();
    }
    #[cfg(tokio_unstable)]
    {
        let rt = built.unwrap().worker_threads(2).build().unwrap();
        let seen = rt.block_on(async {
            let request = SessionMap::new().with_value("tenant", "acme");
            let task = localsession_std::scope(request, || {
                tokio::spawn(async { localsession_std::current().and_then(|s| s.value_cloned::<&str, _>(&"tenant")) })
            });
            task.await.unwrap()
        });
        assert_eq!(seen, Some("acme"));
    }
}
