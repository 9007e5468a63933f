from speech2face.cli import main

raise SystemExit(main())
