//! keygate: API-key authentication, rate limits, quotas and usage metering in front
//! of an upstream chat service. See ARCHITECTURE.md for the map.

pub mod admin;
pub mod auth;
pub mod cli;
pub mod config;
pub mod db;
pub mod demo;
pub mod keys;
pub mod limits;
pub mod maintenance;
pub mod model;
pub mod proxy;
pub mod telemetry;
pub mod usage;
