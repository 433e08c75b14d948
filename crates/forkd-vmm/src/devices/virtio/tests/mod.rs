mod block;
mod fuzz;
mod mmio;
mod net;
mod net_tap;
mod rng;
mod vsock;
