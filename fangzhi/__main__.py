from fangzhi.cli import main

raise SystemExit(main())
