from shardworker.cli import main

raise SystemExit(main())
