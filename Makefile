# The two commands of the README. Both install what a fresh Debian 12 machine lacks.
.PHONY: setup run test bench

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

# A bounded connection storm with figures (not a test).
bench: setup
	cargo build --release
	python3 scripts/bench.py
