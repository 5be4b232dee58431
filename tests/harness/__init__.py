"""Real-server test harness shared by pytest fixtures and bench scripts.

Import from the repository root: ``from tests.harness.dovecot import Dovecot``.
"""
