"""The supervisor process: its loop and signals (`supervisor`), the children
it starts (`children`), hitless reloads (`reload`) and the listening sockets
it owns (`sockets`)."""

from lb.supervisor.supervisor import Supervisor, SupervisorError

__all__ = ["Supervisor", "SupervisorError"]
