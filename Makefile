# Entry points of the project. Only Python 3.11 and make are assumed: run, test, bench and lint
# create .venv and install the pinned requirements into it on first use.
#
#   make run            start the local stack, train once, keep it up until Ctrl-C
#   make run ONCE=1     the same, then stop and exit 0 only if the training run succeeded
#   make run ONCE=1 SCENARIO=drift
#                       the drift scenario in .stack/scenario-drift: normal traffic, a new
#                       scanner, monitoring and one retrain; exit 0 only if it recovered
#   make test           pytest over tests/ (pass options with PYTEST_ARGS="-m 'not e2e' -x")
#   make bench          benchmarks/run.py (ONLY=trainer,docker for some figure groups)
#   make airflow CMD="backfill create --dag-id train_digits ..."
#                       the airflow CLI against the local stack's database and secrets
#   make lint           ruff format --check and ruff check
#   make train-image    the training image ml-loop-train:latest from Dockerfile.train; pass
#                       BASE_IMAGE=... for another base and, for an offline build from ./wheelhouse,
#                       PIP_INSTALL_OPTIONS="--no-index --find-links /tmp/ml-loop-build"
#                       (WHEELHOUSE=... for another folder of the repository)
#   make constraints    re-freeze constraints.txt from a clean install of requirements.txt
#   make clean          delete the state folder .stack (stop the stack first)

PYTHON ?= python3.11
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
# Touched after a successful install; make reinstalls only when the requirements or the
# constraints are newer than it.
INSTALLED := $(VENV)/.requirements-installed
PYTHONPATH_DIRS := include:plugins
PYTEST_ARGS ?=
SCENARIO ?=
RUN_ARGS := $(if $(filter 1 true yes,$(ONCE)),--once) $(if $(SCENARIO),--scenario $(SCENARIO))
# Empty values keep the defaults of Dockerfile.train.
BASE_IMAGE ?=
PIP_INSTALL_OPTIONS ?=
WHEELHOUSE ?=
TRAIN_IMAGE ?= ml-loop-train:latest

.PHONY: run test bench airflow lint constraints clean train-image

$(VENV_PYTHON):
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): requirements.txt constraints.txt | $(VENV_PYTHON)
	$(VENV_PYTHON) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(VENV_PYTHON) -m pip check
	touch $@

run: $(INSTALLED)
	PYTHONPATH=$(PYTHONPATH_DIRS) $(VENV_PYTHON) -m local_stack run $(RUN_ARGS)

# make turns every non-zero exit of pytest into its own exit code 2, so the recipe names the
# case of no collected tests (pytest's exit code 5) that would otherwise read like a crash.
test: $(INSTALLED)
	@status=0; $(VENV_PYTHON) -m pytest $(PYTEST_ARGS) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests (exit code 5)" >&2; fi; \
	exit $$status

airflow: $(INSTALLED)
	PYTHONPATH=$(PYTHONPATH_DIRS) $(VENV_PYTHON) -m local_stack airflow $(CMD)

bench: $(INSTALLED)
	PYTHONPATH=$(PYTHONPATH_DIRS) $(VENV_PYTHON) benchmarks/run.py $(if $(ONLY),--only $(ONLY))

lint: $(INSTALLED)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

# A fresh virtual environment in a temporary folder, so packages installed by hand do not end up
# in the file. The local "+cpu" label of a CPU torch build is dropped, so that the same file
# gives the CUDA build on a GPU machine. The two upper bounds only steer pip's resolver: without them it backtracks for
# minutes through cadwyn releases that need a newer fastapi than Airflow 3.3 allows.
constraints:
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	printf 'cadwyn<7.1\nfastapi<0.137\n' > "$$tmp/resolver-hints.txt"; \
	"$$tmp/venv/bin/python" -m pip install -r requirements.txt -c "$$tmp/resolver-hints.txt"; \
	"$$tmp/venv/bin/python" -m pip check; \
	{ echo '# Frozen from a clean install of requirements.txt with Python 3.11 (pip freeze).'; \
	  echo '# Regenerate with: make constraints'; \
	  "$$tmp/venv/bin/python" -m pip freeze | sed -E 's/^(torch==[0-9.]+)\+cpu$$/\1/'; \
	} > "$$tmp/constraints.txt"; \
	mv "$$tmp/constraints.txt" constraints.txt

train-image:
	docker build -f Dockerfile.train -t $(TRAIN_IMAGE) \
		$(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) \
		$(if $(PIP_INSTALL_OPTIONS),--build-arg PIP_INSTALL_OPTIONS="$(PIP_INSTALL_OPTIONS)") \
		$(if $(WHEELHOUSE),--build-arg WHEELHOUSE=$(WHEELHOUSE)) .

# Refuses while a live launcher holds the state folder, because its services write there.
clean:
	@if [ -s .stack/stack.lock ] && kill -0 "$$(cat .stack/stack.lock)" 2>/dev/null; then \
		echo "the local stack is running (pid $$(cat .stack/stack.lock)); stop it first" >&2; \
		exit 1; \
	fi
	rm -rf .stack

# The docker-compose stack (docker-compose.yaml). compose-env writes .env with random secrets
# once and prints the Airflow login; it never changes an existing .env. COMPOSE picks the client:
# `make compose-up COMPOSE=docker-compose` for the standalone 1.29 release.
COMPOSE ?= docker compose

.PHONY: compose-env compose-up

compose-env:
	python3 include/compose/init-env.py

compose-up: compose-env
	$(COMPOSE) up --detach --build
