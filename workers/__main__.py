from workers.worker import main

raise SystemExit(main())
