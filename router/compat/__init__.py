"""Every patch of pynetdicom or pydicom behaviour the router relies on, in one place.

Each function names the upstream issue or missing feature it works around, and
tests/compat/test_*.py hold a test per workaround that fails the day upstream changes what it
relies on (a private attribute renamed, a fix released), so that it can be removed or adapted.

- `pynetdicom`: received data sets streamed to files in the spool, the reactor race before a
  C-STORE, a server made with our own socket options that `AE.shutdown()` still stops, `poll()`
  instead of `select()` (descriptors above 1023), an A-ASSOCIATE-RJ sent from `EVT_REQUESTED`
  that reaches the peer, and a listener that bounds a caller (TLS handshake off the accept
  loop, request and PDU deadlines, PDU size, connections not yet associated kept apart) with a
  guard on received data sets (partial files removed, unusable C-STOREs answered).
- `pydicom`: the JPEG XL transfer syntax UIDs pydicom 3.0 does not know, and big endian
  OW/OL/OF/OD values that pydicom writes little endian without swapping their bytes, and the
  ambiguous VRs of implicit VR input (curve data, LUT data) pydicom cannot write explicit.
- `futures`: the codec pool's worker processes, to kill a hung one, and the thread that reaps
  them (concurrent.futures).
"""
