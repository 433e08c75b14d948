mod block;
mod fuzz;
mod mmio;
mod net;
mod rng;
mod vsock;
