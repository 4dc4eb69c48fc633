"""Prometheus /metrics, scraped during a real run: the controller's (logging.metrics_port) and an
external reward server's (its metrics_port), both on 127.0.0.1. The values move step by step."""

from __future__ import annotations

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
            "transport.reward": "grpc",
            "transport.grpc.auth": False,
            "transport.grpc.reward_address": f"127.0.0.1:{server.port}",
        },
    )
    controller = Controller(cfg, tmp_path / "run", log=print)
    scrapes = []
    controller.start()
    try:
        controller.run(on_step=lambda m: scrapes.append((m, _scrape(controller.exporter.port))))
        # a caller's bad request is counted by its code
        client = RewardClient(GrpcConfig(auth=False, retries=0), f"127.0.0.1:{server.port}")
        try:
            client.score(["1+1="], ["2"], [{}])  # no 'answer' metadata: the reward refuses the sample
        except RewardError:
            pass
        client.close()
        reward_metrics = _scrape(server.server.metrics_port)
    finally:
        controller.shutdown()
        server.stop(0)

    assert [s[("keel_step", ())] for _, s in scrapes] == [1.0, 2.0, 3.0]
    for m, s in scrapes:
        assert s[("keel_reward_mean", ())] == m["reward_mean"] and s[("keel_kl", ())] == m["kl"]
        assert s[("keel_step_phase_seconds", (("phase", "update"),))] == m["time/update"]
        assert s[("keel_rollout_workers", ())] == 1.0 and s[("keel_restarts", (("role", "run"),))] == 0.0
    assert [s[("keel_weight_sync_seconds_count", ())] for _, s in scrapes] == [1.0, 2.0, 3.0]
    assert [s[("keel_reward_call_seconds_count", ())] for _, s in scrapes] == [1.0, 2.0, 3.0]
    assert reward_metrics[("keel_reward_requests_total", (("code", "OK"),))] == 3.0  # one per step
    assert reward_metrics[("keel_reward_requests_total", (("code", "INVALID_ARGUMENT"),))] == 1.0
    assert reward_metrics[("keel_reward_samples_total", ())] == 3 * 16
    assert reward_metrics[("keel_reward_batch_size_count", ())] >= 3
    assert controller.exporter is None  # closed with the run
