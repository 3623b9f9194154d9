//! End-to-end tests: one binary, one module per scenario.

mod trust_demo;
