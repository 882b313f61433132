pub mod cluster;
pub mod media;
pub mod nvml;
pub mod otlp;
pub mod prometheus;
pub mod service;

/// A loopback port free now (for the programs a test starts that cannot take port 0).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().unwrap().port()
}
