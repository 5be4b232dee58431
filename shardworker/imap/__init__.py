"""IMAP: connecting and logging in (``connect``), folder resolution (``folders``), the
provider connectivity probe (``probe``) and the per-folder session (``session``)."""
