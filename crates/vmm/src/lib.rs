//! One virtual machine on KVM: guest memory (memfd), vCPU threads, boot loaders, legacy devices
//! (serial, i8042 reset, power-off port), the virtio-mmio transport and dirty-page tracking.
