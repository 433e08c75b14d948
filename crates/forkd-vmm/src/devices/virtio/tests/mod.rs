mod block;
mod fuzz;
mod mmio;
mod rng;
mod vsock;
