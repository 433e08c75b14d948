pub mod netlab;
