"""Receiving: the pynetdicom adapter (`scp`), what happens to a received file (`intake`) and the
strict header read (`dicomfile`). Loads neither the forwarding side nor numpy."""
