"""Errors a job reports to the person running it."""

from __future__ import annotations


class JobError(RuntimeError):
    """A job that cannot start; the message says why and what to do."""
