"""train_gpt2.py's command, killed with SIGKILL at the point $TRAIN_GPT2_TEST_KILL names (tests/test_resume.py):
"after:K": every process right after step K and its save, if any (at the top of the next step, before anything
of it runs); "save:K": every process during step K's save, once every file is written into step_<K>.tmp/ but
before the rename (a kill in the middle of a save)."""
import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train_gpt2  # noqa: E402

KILL_ENV = "TRAIN_GPT2_TEST_KILL"


def kill_at(when: str, k: int) -> None:
    """Wrap the trainer's Clock.start_step ("after") or Checkpoints._publish ("save") with the kill at step k."""
    def kill():
        os.kill(os.getpid(), signal.SIGKILL)

    if when == "after":
        start_step = train_gpt2.Clock.start_step

        def start_step_or_kill(clock, step):
            if step == k and step != clock.start:  # steps were taken in this process: k is done
                kill()
            start_step(clock, step)
        train_gpt2.Clock.start_step = start_step_or_kill
    elif when == "save":
        publish = train_gpt2.Checkpoints._publish

        def publish_or_kill(checkpoints, step, tmp, final):
            if step == k:
                kill()
            return publish(checkpoints, step, tmp, final)
        train_gpt2.Checkpoints._publish = publish_or_kill
    else:
        raise SystemExit(f"{KILL_ENV}={when}:{k}: expected after:K or save:K")


if __name__ == "__main__":
    when, _, k = os.environ.get(KILL_ENV, "").partition(":")
    if when:
        kill_at(when, int(k))
    train_gpt2.main(sys.argv[1:])
