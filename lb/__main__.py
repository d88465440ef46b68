from lb.cli import main

raise SystemExit(main())
