# Two commands for a newcomer: `make demo` and `make test`.
PYTHON ?= python3.12
VENV   := .venv
BIN    := $(VENV)/bin
# MCsquare's binaries and material database ship inside this wheel; its Python dependencies are
# not needed (we only use the engine files), so it is installed without them.
OPENTPS := opentps-core==3.0.1
SYSTEM_PACKAGES := dcmtk openssh-server poppler-utils chromium chromium-driver orthanc
SYSTEM_COMMANDS := storescu sshd pdftoppm chromium chromedriver Orthanc

.PHONY: demo test venv system-deps bench lint clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q -e '.[test,photon]'
	$(BIN)/pip install -q --no-deps '$(OPENTPS)'
	touch $@

venv: $(VENV)/.installed

# System packages the tests talk to (dcmtk and Orthanc as the TPS, sshd for the ssh backend, pdftoppm for
# reports, headless Chromium + chromedriver for the web page). Installed only when running as root and only when missing.
system-deps:
	@missing=""; for c in $(SYSTEM_COMMANDS); do command -v $$c >/dev/null 2>&1 || \
	  [ -x /usr/sbin/$$c ] || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    echo "installing system packages for:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	  else \
	    echo "missing:$$missing -- install with: sudo apt-get install $(SYSTEM_PACKAGES)"; exit 1; \
	  fi; \
	fi

demo: venv
	$(BIN)/mcnode demo --out demo-out

test: system-deps venv
	$(BIN)/ruff check dicom_node anonymizer cloud tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

# The benchmarks compare against other tools (dicognito); those come from the bench extra.
bench: venv
	$(BIN)/pip install -q -e '.[bench]'
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

lint: venv
	$(BIN)/ruff check dicom_node anonymizer cloud tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) demo-out .pytest_cache .mypy_cache
