//! Fake Consul, Eureka and Kubernetes API servers replaying recorded fixtures (placeholder).
