//! KVM state holders: the VM (fd, memory slots, irqchip, interrupt/notification hooks) and the
//! vCPUs (boot configuration, run loop, state save/restore).

pub mod control;
pub mod vcpu;
pub mod vm;

/// A KVM ioctl failed; `op` names it (e.g. "KVM_CREATE_VM").
#[derive(Debug, thiserror::Error)]
#[error("{op}")]
pub struct KvmError {
    pub op: &'static str,
    #[source]
    pub source: kvm_ioctls::Error,
}

pub(crate) fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError { op, source }
}
