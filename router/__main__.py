from router.operate.cli import main

if __name__ == "__main__":  # not when a codec worker process is spawned
    raise SystemExit(main())
