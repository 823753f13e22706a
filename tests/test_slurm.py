"""The Slurm test cluster itself: what the launcher's Slurm tests stand on."""

import subprocess

import pytest

from tests.slurm_cluster import NODES, SlurmCluster


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    cluster = SlurmCluster.start(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


def test_the_test_cluster_runs_a_step_on_each_of_its_three_nodes(slurm):
    command = ["srun", "-N3", "--ntasks-per-node=1", "printenv", "SLURMD_NODENAME"]
    done = subprocess.run(command, env=slurm.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + slurm.logs()
    assert sorted(done.stdout.split()) == list(NODES)


def test_a_batch_job_runs_to_completion_and_reports_its_exit_code(slurm, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n#SBATCH --nodes=2\nsrun -N2 true\nexit 7\n")
    done = subprocess.run(
        ["sbatch", "--wait", "--parsable", f"--output={tmp_path / 'out.txt'}", str(script)],
        env=slurm.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 7, done.stdout + done.stderr + slurm.logs()
