"""Prometheus /metrics, scraped during a real run: the controller's (logging.metrics_port) and an
external reward server's (its metrics_port), both on 127.0.0.1. The values move step by step; the
reward server goes away for a second after step 1, which shows as errors by role and kind."""

from __future__ import annotations

import threading
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from integration.configs import demo_config


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_controller_and_the_reward_server_serve_metrics_that_move(demo_inputs, ray_session, tmp_path):
    from keel.config import GrpcConfig
    from keel.controller.loop import Controller
    from keel.reward.client import RewardClient
    from keel.reward.model import RewardError
    from keel.reward.server import RewardServerConfig, start_reward_server

    base = demo_config(*demo_inputs)
    server = start_reward_server(
        RewardServerConfig(reward=base.reward, grpc=GrpcConfig(auth=False), port=0, metrics_port=0)
    )
    cfg = demo_config(
        *demo_inputs,
        **{
            "rollout.resources": {"num_cpus": 0.25},
            "controller.steps": 3,
            "controller.prompts_per_step": 16,
            "algorithm.mini_batch_size": 16,
            "logging.metrics_port": 0,
            "logging.metrics_host": "0.0.0.0",  # every interface (a scraper in the cluster); gRPC stays on 127.0.0.1
            "transport.reward": "grpc",
            "transport.grpc.auth": False,
            "transport.grpc.retries": 0,  # each UNAVAILABLE reaches the controller (no retries inside the client)
            "transport.grpc.reward_address": f"127.0.0.1:{server.port}",
        },
    )
    controller = Controller(cfg, tmp_path / "run", log=print)
    scrapes, servers = [], [server]

    def on_step(m):
        assert controller.exporter._server.server_address[0] == "0.0.0.0"
        scrapes.append((m, _scrape(controller.exporter.port)))
        if m["step"] == 0:  # the reward server goes away for a second: step 2 meets UNAVAILABLE
            servers[0].stop(0)
            again = RewardServerConfig(
                reward=base.reward, grpc=GrpcConfig(auth=False), port=server.port, metrics_port=0
            )
            threading.Timer(1.0, lambda: servers.append(start_reward_server(again))).start()

    controller.start()
    try:
        controller.run(on_step=on_step)
        # a caller's bad request is counted by its code
        client = RewardClient(GrpcConfig(auth=False, retries=0), f"127.0.0.1:{server.port}")
        try:
            client.score(["1+1="], ["2"], [{}])  # no 'answer' metadata: the reward refuses the sample
        except RewardError:
            pass
        client.close()
        reward_metrics = _scrape(servers[-1].server.metrics_port)
    finally:
        controller.shutdown()
        servers[-1].stop(0)

    assert [s[("keel_step", ())] for _, s in scrapes] == [1.0, 2.0, 3.0]
    for m, s in scrapes:
        assert s[("keel_reward_mean", ())] == m["reward_mean"] and s[("keel_kl", ())] == m["kl"]
        assert s[("keel_step_phase_seconds", (("phase", "update"),))] == m["time/update"]
        assert s[("keel_rollout_workers", ())] == 1.0 and s[("keel_restarts", (("role", "run"),))] == 0.0
    assert [s[("keel_weight_sync_seconds_count", ())] for _, s in scrapes] == [1.0, 2.0, 3.0]
    # the one rollout worker serves each new version; the reward server's absence shows as errors
    assert [s[("keel_rollout_worker_weight_version", (("worker", "rollout-0"),))] for _, s in scrapes] == [1, 2, 3]
    unavailable = [s.get(("keel_errors", (("kind", "unavailable"), ("role", "reward"))), 0.0) for _, s in scrapes]
    assert unavailable[0] == 0.0 and unavailable[1] >= 1.0 and unavailable[2] == unavailable[1], unavailable
    assert [s[("keel_reward_call_seconds_count", ())] for _, s in scrapes] == [1.0, 2.0, 3.0]
    # the server that came back answered steps 2 and 3, and the bad request
    assert reward_metrics[("keel_reward_requests_total", (("code", "OK"),))] == 2.0  # one per step
    assert reward_metrics[("keel_reward_requests_total", (("code", "INVALID_ARGUMENT"),))] == 1.0
    assert reward_metrics[("keel_reward_samples_total", ())] == 2 * 16
    assert reward_metrics[("keel_reward_batch_size_count", ())] >= 2
    assert controller.exporter is None  # closed with the run
