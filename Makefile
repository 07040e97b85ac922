# Music-generation pipeline. `make help` lists the targets; every target installs what it needs.
SHELL := /bin/bash
PY    := .venv/bin/python
STAMP := .venv/.installed

EXP       ?=
RUN       ?=
DATA      ?=
CLUSTER   ?=
GPUS      ?=
NODES     ?=
FORCE     ?=
DRY_RUN   ?=
OVERRIDES ?=
JOB       ?=
CKPT      ?=
N         ?=
TEMPERATURE ?=
SEED      ?=
GEN_EPOCH ?=
CONTINUE  ?=
GRID      ?=
SWEEP     ?=
DELETE    ?=
ROOT      ?=
PYTEST_ARGS ?=
DEVICE    ?=

# Options shared by the pipeline targets, built only from what was given.
RUN_OPTS = $(if $(EXP),--experiment $(EXP)) $(if $(RUN),--run $(RUN)) $(if $(DATA),--data $(DATA)) \
           $(if $(CLUSTER),--cluster $(CLUSTER)) $(if $(GPUS),--gpus $(GPUS)) $(if $(NODES),--nodes $(NODES)) \
           $(foreach s,$(FORCE),--force $(s)) $(if $(CONTINUE),--continue $(CONTINUE)) \
           $(if $(DRY_RUN),--dry-run) $(OVERRIDES)
ROOT_OPT = $(if $(ROOT),--root $(ROOT))

.PHONY: help install lock test test-fast demo learn corpus prepare train-stage1 train-stage2 train-stage3 \
        pipeline sweep gc status cancel resume audit generate evaluate bench gpu-check mlflow-server mlflow-ui \
        fetch-weights slurm-up slurm-down clean

help:  ## List the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'
	@echo; echo "  Variables: EXP RUN DATA CLUSTER=local|slurm GPUS NODES FORCE=step CONTINUE=stage DRY_RUN=1 ROOT OVERRIDES=\"key.sub=value ...\""

install: $(STAMP)  ## Create .venv and install the package (pinned by constraints.txt)

$(STAMP): setup.cfg constraints.txt
	test -d .venv || python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -c constraints.txt -e '.[dev,bench]'
	touch $(STAMP)

lock: $(STAMP)  ## Rewrite constraints.txt from the current .venv
	{ echo "# Versions tested together on this project's machines (Python 3.11, x86_64)."; \
	  echo "# Used as pip constraints by 'make install'; refresh with 'make lock'."; \
	  .venv/bin/pip freeze --exclude-editable; } > constraints.txt

test: $(STAMP)  ## Run the whole test suite (SLURM tests need `make slurm-up`, done by .ci/run)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)  ## Unit-level tests only: no SLURM, pipeline runs, trainers, torchrun or servers (< 3 min)
	$(PY) -m pytest -m "not slurm and not slow and not integration" --timeout=120 $(PYTEST_ARGS)

demo: $(STAMP)  ## Whole pipeline on CPU on the generated corpus (local executor): EXP=demo|musigan|powermuse|aurl|musicvae
	$(PY) -m pipeline.run demo --experiment $(or $(EXP),demo) --cluster local $(if $(RUN),--run $(RUN)) $(OVERRIDES)

learn: $(STAMP)  ## Demo recipe on two corpora; writes docs/learning.md (SEEDS="1234 777")
	$(PY) -m pipeline.learn $(if $(SEEDS),--seeds $(SEEDS)) $(if $(EXP),--experiment $(EXP)) $(if $(OVERRIDES),--overrides $(OVERRIDES))

corpus: $(STAMP)  ## Write the seeded demo corpus of mp3 songs to DATA (default runs/demo_corpus)
	$(PY) -m data_prep.corpus --out $(or $(DATA),runs/demo_corpus)

prepare: $(STAMP)  ## chunk -> pairs -> encode on DATA (or the demo corpus)
	$(PY) -m pipeline.run prepare $(RUN_OPTS)

train-stage1: $(STAMP)  ## Stage 1 (and whatever it needs): GPUS=4 NODES=1
	$(PY) -m pipeline.run stage1 $(RUN_OPTS)

train-stage2: $(STAMP)  ## Stage 2 (and whatever it needs)
	$(PY) -m pipeline.run stage2 $(RUN_OPTS)

train-stage3: $(STAMP)  ## Stage 3 VAE-GAN (and whatever it needs)
	$(PY) -m pipeline.run stage3 $(RUN_OPTS)

pipeline: $(STAMP)  ## Every step through the audit
	$(PY) -m pipeline.run all $(RUN_OPTS)

sweep: $(STAMP)  ## One run per point of a grid: GRID=demo (configs/grids/demo.yaml); shared steps run once
	$(PY) -m pipeline.sweep --grid $(or $(GRID),demo) $(if $(CLUSTER),--cluster $(CLUSTER)) $(OVERRIDES)

gc: $(STAMP)  ## List store versions no run uses, with sizes; DELETE=1 deletes them
	$(PY) -m pipeline.gc $(ROOT_OPT) $(if $(DELETE),--delete)

status: $(STAMP)  ## Steps, job ids, states, elapsed time, latest metric (SWEEP=<name>: one table per sweep)
	$(PY) -m pipeline.status $(ROOT_OPT) $(if $(RUN),--run $(RUN)) $(if $(SWEEP),--sweep $(SWEEP))

cancel: $(STAMP)  ## Cancel the run's queued and running jobs
	$(PY) -m pipeline.cancel $(ROOT_OPT) $(if $(RUN),--run $(RUN))

resume: $(STAMP)  ## Resume a failed/preempted step: JOB=<slurm id | step>
	$(PY) -m pipeline.resume $(ROOT_OPT) --job $(JOB) $(if $(RUN),--run $(RUN))

audit: $(STAMP)  ## Discriminator-over-epochs audit: GEN_EPOCH=<n>
	$(PY) -m jobs.audit $(if $(RUN),--run runs/$(RUN)) $(if $(GEN_EPOCH),--gen-epoch $(GEN_EPOCH))

generate: $(STAMP)  ## Audio from noise: CKPT=... N=8 TEMPERATURE=1.0 SEED=0
	$(PY) -m jobs.generate $(if $(RUN),--run runs/$(RUN)) $(if $(CKPT),--checkpoint $(CKPT)) \
	  $(if $(N),--n $(N)) $(if $(TEMPERATURE),--temperature $(TEMPERATURE)) $(if $(SEED),--seed $(SEED))

evaluate: $(STAMP)  ## Fréchet distance, diversity, spectral flatness and RMS against real data
	$(PY) -m jobs.evaluate $(if $(RUN),--run runs/$(RUN))

bench: $(STAMP)  ## Benchmarks against baselines; writes docs/benchmarks.md
	$(PY) -m bench.run_all

gpu-check: $(STAMP)  ## On a CUDA node (srun --gpus=1 make gpu-check): does the GPU path work, how fast; <= 5 min, table + JSON
	$(PY) -m bench.gpu_check $(if $(DEVICE),--device $(DEVICE))

# Host headers the server accepts (jobs reach it by this machine's name or a private IP).
MLFLOW_ALLOWED_HOSTS ?= localhost:*,127.0.0.1:*,$(shell hostname):*,$(shell hostname -f):*,10.*,192.168.*,172.*

mlflow-server: $(STAMP)  ## MLflow tracking server (basic auth; credentials in ~/.config/musicgen, mode 600): PORT=5000
	$(PY) -m pipeline.mlflow_server --root runs --host $(or $(HOST),0.0.0.0) --port $(or $(PORT),5000)

mlflow-ui: $(STAMP)  ## Look at the runs: http://127.0.0.1:5000
	.venv/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/runs/mlflow.db --port $(or $(PORT),5000)

fetch-weights:  ## How to place the EnCodec 24 kHz weights (run on a login node with internet)
	@echo "On a machine with internet access:"
	@echo "  mkdir -p weights && curl -L -o weights/encodec_24khz-d7cc33bc.th \\"
	@echo "    https://dl.fbaipublicfiles.com/encodec/v0/encodec_24khz-d7cc33bc.th"
	@echo "then copy weights/ next to this Makefile (or set encode.weights_dir)."
	@echo "Compute nodes never download: a missing file is an error."

slurm-up:  ## Start the single-node test SLURM cluster (root; 4 fake GPUs)
	bash slurm_templates/start_test_cluster.sh

slurm-down:  ## Stop the test cluster
	bash slurm_templates/start_test_cluster.sh stop

clean:  ## Remove runs/ (keeps .venv)
	rm -rf runs
