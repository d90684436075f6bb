"""The config in force, and its reload on SIGHUP.

A reload re-reads the config file and takes over `remote_aes` and `security`
only: they are read per association and per request, so running associations
go on undisturbed. Other keys (ports, storage, database, ...) need a restart;
a reload that changes them says so. A file that does not load is logged in one
line (file, key, problem) and changes nothing.
"""
from __future__ import annotations

import logging
from dataclasses import fields, replace

from pacs.access import Policy
from pacs.config import Config, ConfigError, load

log = logging.getLogger(__name__)
RELOADABLE = ("remote_aes", "security")


class LiveConfig:
    """The config and access policy in force; swapped together, never half."""

    def __init__(self, config: Config):
        self._state = (config, Policy(config))

    @property
    def current(self) -> Config:
        return self._state[0]

    @property
    def policy(self) -> Policy:
        return self._state[1]

    def reload(self) -> bool:
        """Take `remote_aes` and `security` from the file again; False (logged) if it is bad."""
        config = self.current
        assert config.source is not None
        try:
            fresh = load(config.source)
        except ConfigError as exc:
            log.error("reload failed, the previous config stays in force: %s", exc)
            return False
        later = [f.name for f in fields(Config)
                 if f.name not in RELOADABLE and f.name != "source"
                 and getattr(fresh, f.name) != getattr(config, f.name)]
        if later:
            log.warning("reload: %s changed in %s; that takes effect at the next restart",
                        ", ".join(later), config.source)
        updated = replace(config, remote_aes=fresh.remote_aes, security=fresh.security)
        self._state = (updated, Policy(updated))
        log.info("reloaded remote_aes (%d AEs) and security from %s",
                 len(updated.remote_aes), config.source)
        return True
