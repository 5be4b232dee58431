"""Provider secrets: AES-256-GCM envelopes (``crypto``) and the read chain (``store``)."""
