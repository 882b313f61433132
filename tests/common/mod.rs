pub mod media;
pub mod otlp;
pub mod prometheus;
pub mod service;
