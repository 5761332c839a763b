//! The `strait` and `straitctl` command lines. The binaries are thin: each
//! role's work lives in its crate (`strait-ca`, `strait-broker`, ...).

pub mod cli;
pub mod lab;
