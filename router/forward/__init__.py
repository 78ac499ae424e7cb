"""Forwarding: one pipeline per destination (`forwarder`), the send seam (`sender`, `senders`)
and its DIMSE C-STORE sender (`dimse`, `association`, `outbound`), what holds a destination's
jobs (`waiting`) and its bandwidth cap (`throttle`)."""
