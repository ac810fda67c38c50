from netsurgery.cli import main

raise SystemExit(main())
