# The two commands of the README. Both install what a fresh Debian 12 machine lacks.
.PHONY: setup run test bench image

setup:
	@bash scripts/setup.sh

# Capture live TCP links on this host and print them (embedded default config). Needs root.
run: setup
	cargo build --release
	./target/release/ridley run

# Everything CI runs: format, lints, unit tests, end-to-end tests on the real kernel.
test: setup
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo build --workspace
	cargo test --workspace
	python3 -m pytest -v tests/

# Every figure of the README's benchmark table, with its references, and the table
# regenerated from them (not a test; about 55 minutes with the 30-minute soak).
bench: setup
	cargo build --release
	python3 scripts/bench.py --readme

# The image (Dockerfile, multi-stage), with podman or docker, whichever exists. Where no
# registry is reachable, the debian:bookworm-slim base is made locally first.
image:
	@if command -v podman >/dev/null; then \
		bash scripts/base-image.sh; \
		cas=""; \
		if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then \
			cas="-v /usr/local/share/ca-certificates:/usr/local/share/ca-certificates:ro"; \
		fi; \
		podman --runtime runc build --ulimit nofile=1024:1024 --ulimit nproc=4096:4096 $$cas -t ridley:0.1.0 . ; \
	elif command -v docker >/dev/null; then \
		docker build -t ridley:0.1.0 . ; \
	else \
		echo "make image: neither podman nor docker is installed" >&2; exit 1; \
	fi
