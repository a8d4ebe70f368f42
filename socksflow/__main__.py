from socksflow.cli import main

raise SystemExit(main())
