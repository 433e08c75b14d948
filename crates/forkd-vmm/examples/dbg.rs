use forkd_vmm::*;
fn main() {
    let serial = SharedBuffer::new();
    let mut config = VmConfig::new(KernelSource::parse("builtin:demo").unwrap());
    config.serial = SerialOutput::Buffer(serial.clone()); config.mem_mib = 64; config.vcpus = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(1);
    let mut vmm = build(&config).unwrap();
    vmm.start().unwrap();
    for _ in 0..10 {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let raw: [u64;2] = vm_memory::Bytes::read_obj(vmm.memory(), vm_memory::GuestAddress(0x6000)).unwrap();
        println!("{:x?} stop={:?} serial={:?}", raw, vmm.stop_reason(), serial.text());
    }
}
