"""What every lb process shares: the config (`config`, `sections`, `values`),
the messages between processes (`messages`) and the Clone pattern they travel
by (`clone`), logging (`log`), how a child starts and speaks to its
supervisor (`boot`, `child`), the fleet composed with the config (`fleet`),
TLS contexts and session ticket keys (`tls`, `tickets`)."""
