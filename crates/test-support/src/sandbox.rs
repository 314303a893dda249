//! The sandbox cluster for e2e tests (see scripts/sandbox).
