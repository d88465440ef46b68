from lb.admin.app import main

raise SystemExit(main())
