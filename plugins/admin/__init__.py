"""Admin API and live dashboard: the ``admin`` section.

```yaml
admin:
  listen: 127.0.0.1:9180      # loopback only, unless a token is set
  token_file: admin.token     # or token: "...": required by every /api/ request when set
  recent: 1000                # decisions kept to replay against a new rule file before a reload
```

Open ``http://127.0.0.1:9180/`` for the dashboard (with a token: ``/#token=TOKEN``).  The
JSON API (``/api/sessions``, ``/api/rules``, ``/api/reload``…) is listed in ``docs/admin.md``;
``socksflow sessions`` and ``socksflow reload`` talk to it.

Needs aiohttp (``pip install 'socksflow[admin]'``): an HTTP server with streaming that runs
on the server's own event loop, so the API reads sessions without locks or threads.  Without
an ``admin:`` section the plugin is dormant and aiohttp is never imported; with one and no
aiohttp, the configuration is refused naming the section and the package to install.
"""

from __future__ import annotations

import logging
from typing import Any

from socksflow import Config, Server, Session, StashKey, hookimpl

from .settings import SETTINGS, read_settings
from .state import Observed

log = logging.getLogger("socksflow.admin")

LISTENER = StashKey[Any]("admin.listener")
OBSERVED = StashKey[Observed]("admin.observed")


@hookimpl
def socksflow_configure(config: Config) -> bool | None:
    settings = read_settings(config)
    if settings is None:
        return False  # dormant: no admin API
    config.stash[SETTINGS] = settings


@hookimpl
async def socksflow_startup(server: Any) -> None:  # Any: reads server.pm, beyond socksflow.Server
    settings = server.config.stash.get(SETTINGS)
    if settings is None:
        return
    from .api import Listener  # aiohttp is imported only when the admin API is configured

    observed = Observed(server)
    listener = Listener(server, observed, settings)
    try:  # with --workers N, worker 0 answers for all of them (see .fanout)
        await listener.start(str(settings.listen.host), settings.listen.port)
    except OSError as exc:
        await listener.stop()
        raise OSError(exc.errno, f"admin: cannot listen on {settings.listen}: {exc.strerror}") from None
    acl = server.pm.get_plugin("acl")
    if acl is not None and settings.recent:
        acl.record_decisions(server, settings.recent)
    server.stash[OBSERVED] = observed
    server.stash[LISTENER] = listener
    if listener.address.startswith("unix:"):
        log.info("admin API of worker %d on %s (worker 0 answers for all)", server.worker, listener.address)
    else:
        log.info("admin API and dashboard on http://%s/", listener.address)


@hookimpl
async def socksflow_shutdown(server: Server) -> None:
    listener = server.stash.get(LISTENER)
    if listener is not None:
        await listener.stop()
        del server.stash[LISTENER]


@hookimpl
def socksflow_session_end(session: Session) -> None:
    observed = session.server.stash.get(OBSERVED)
    if observed is not None:
        observed.ended_session(session)
