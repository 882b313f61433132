pub mod cluster;
pub mod media;
pub mod nvml;
pub mod otlp;
pub mod prometheus;
pub mod service;
