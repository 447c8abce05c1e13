"""Transports between roles: the wire schema (wire), the trajectory channel over ZeroMQ
(channel) and the versioned weight broadcast over torch.distributed (weights)."""
