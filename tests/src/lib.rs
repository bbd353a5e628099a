//! Shared helpers for localsession's cross-crate tests.
