//! The extensible layer-2 virtual switch: a frame pipeline (ingress policies → extensions →
//! forwarding → egress policies → delivery), MAC learning, port policies, extensions and meters.
