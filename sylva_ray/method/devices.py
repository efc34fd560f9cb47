"""Device and network classes for the simulated clock: what a client's hardware and link can do.

A client's *profile* is a device class and a network class, named ``"<device>@<network>"`` (e.g.
``jetson_orin_nano@wifi``). The built-in numbers come from vendors' specifications or published
measurements, each with its source beside it; where a vendor publishes cores and clocks but no
FLOP/s, the peak is derived as cores x FLOP per cycle x clock and the comment says so.

Peak FLOP/s are never reached in training: ``efficiency`` is the sustained share of the peak a
PyTorch training step gets (kernel launch overheads, memory-bound layers, small batches). The
built-in factors are stated assumptions, not measurements of these devices: 0.35 for GPUs (model
FLOP utilisation of eager-mode ViT training on datacenter GPUs is reported at 30-50%; edge GPUs
with small batches sit at the low end) and 0.25 for CPUs (NEON/AVX kernels on small matrices).
``system.efficiency`` overrides them all; ``system.device_classes`` adds or replaces classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from sylva_ray.base.config import ExperimentConfig

GPU_EFFICIENCY = 0.35
CPU_EFFICIENCY = 0.25
PROFILE_SEPARATOR = "@"


@dataclass(frozen=True)
class DeviceClass:
    """Compute and memory of one kind of device."""

    flops_per_s: Mapping[str, float]  # sustained-peak FLOP/s by runtime.precision ("fp32", "tf32", "bf16")
    memory_gb: float
    efficiency: float
    availability: float  # probability of being online in a round (used with system.availability)

    def peak(self, precision: str) -> float:
        """Peak FLOP/s at ``precision``; a device without a faster path runs it at fp32 speed."""
        return float(self.flops_per_s.get(precision, self.flops_per_s["fp32"]))


@dataclass(frozen=True)
class NetworkClass:
    """The client's link to the server."""

    downlink_mbps: float
    uplink_mbps: float
    latency_s: float  # one round trip, paid once for the download and once for the upload


def _gpu(fp32: float, memory_gb: float, availability: float, **faster: float) -> DeviceClass:
    return DeviceClass({"fp32": fp32, **faster}, memory_gb, GPU_EFFICIENCY, availability)


def _cpu(fp32: float, memory_gb: float, availability: float) -> DeviceClass:
    return DeviceClass({"fp32": fp32}, memory_gb, CPU_EFFICIENCY, availability)


DEVICE_CLASSES: dict[str, DeviceClass] = {
    # NVIDIA Jetson Orin Nano 8GB: 1024 Ampere CUDA cores at 625 MHz (Jetson Orin Nano datasheet) ->
    # 1024 x 2 x 0.625e9 = 1.28 TFLOP/s fp32; 8 GB shared LPDDR5. FP16/BF16 tensor-core rate not
    # published for this module: fp32 speed is assumed for every precision.
    "jetson_orin_nano": _gpu(1.28e12, 8.0, availability=0.95),
    # NVIDIA Jetson AGX Orin 64GB: 2048 Ampere CUDA cores at 1.3 GHz (Jetson AGX Orin datasheet) ->
    # 2048 x 2 x 1.3e9 = 5.3 TFLOP/s fp32; 64 GB LPDDR5.
    "jetson_agx_orin": _gpu(5.3e12, 64.0, availability=0.95),
    # Raspberry Pi 5: 4 x Cortex-A76 at 2.4 GHz (raspberrypi.com product brief); the A76 issues two
    # 128-bit NEON FMAs per cycle = 16 fp32 FLOP/cycle -> 4 x 16 x 2.4e9 = 154 GFLOP/s; 8 GB model.
    "raspberry_pi5": _cpu(1.54e11, 8.0, availability=0.95),
    # Mid-range phone, Snapdragon 7 Gen 3 CPU (Qualcomm product brief: 1 x A715 at 2.63 GHz, 3 x A715
    # at 2.4 GHz, 4 x A510 at 1.8 GHz): A715 16 fp32 FLOP/cycle, A510 8 -> 157 + 58 = 215 GFLOP/s; 8 GB.
    # Phones are often off charger or off Wi-Fi: online 80% of rounds (assumption).
    "phone_midrange": _cpu(2.15e11, 8.0, availability=0.8),
    # High-end phone, Snapdragon 8 Gen 3 CPU (Qualcomm product brief: 1 x X4 at 3.3 GHz, 5 x A720 at
    # 3.15/2.96 GHz, 2 x A520 at 2.27 GHz): X4 32 fp32 FLOP/cycle, A720 16, A520 8 -> 106 + 245 + 36 =
    # 387 GFLOP/s; 12 GB.
    "phone_highend": _cpu(3.87e11, 12.0, availability=0.8),
    # Laptop CPU, 4 cores with AVX2 (two 256-bit FMA units = 32 fp32 FLOP/cycle) at 3.0 GHz sustained
    # all-core: 4 x 32 x 3.0e9 = 384 GFLOP/s; 16 GB.
    "laptop_cpu": _cpu(3.84e11, 16.0, availability=0.9),
    # Cloud GPU, NVIDIA A10 / AWS A10G (cluster/aws.yaml's g5 nodes; NVIDIA A10 datasheet): 31.2 TFLOP/s
    # fp32, 62.5 TF32 and 125 BF16 dense tensor-core; 24 GB.
    "cloud_a10g": _gpu(31.2e12, 24.0, availability=1.0, tf32=62.5e12, bf16=125e12),
}

NETWORK_CLASSES: dict[str, NetworkClass] = {
    # LTE: Opensignal's mobile network experience reports (2023) put typical 4G at ~20-40 Mbps down,
    # ~5-10 up, ~50 ms latency.
    "4g": NetworkClass(downlink_mbps=30.0, uplink_mbps=8.0, latency_s=0.05),
    # 5G (sub-6 GHz): Opensignal 5G experience reports (2023): ~150-250 Mbps down, ~15-25 up, ~30 ms.
    "5g": NetworkClass(downlink_mbps=200.0, uplink_mbps=20.0, latency_s=0.03),
    # Home broadband: Ookla Speedtest Global Index, fixed broadband medians (late 2023): ~90 Mbps down,
    # ~40 up, ~10-15 ms.
    "broadband": NetworkClass(downlink_mbps=90.0, uplink_mbps=40.0, latency_s=0.015),
    # Wi-Fi 5 in a lab or building, to an on-premise server: ~150 Mbps each way in practice, ~5 ms.
    "wifi": NetworkClass(downlink_mbps=150.0, uplink_mbps=150.0, latency_s=0.005),
    # Datacenter: g5.xlarge "up to 10 Gigabit" (AWS instance page), sub-millisecond round trips.
    "datacenter": NetworkClass(downlink_mbps=10_000.0, uplink_mbps=10_000.0, latency_s=0.0005),
}


@dataclass(frozen=True)
class Profile:
    """A client's device and network, as the clock uses them."""

    name: str
    device: str
    network: str
    flops_per_s: float  # peak at the run's precision
    efficiency: float
    memory_gb: float
    availability: float
    downlink_mbps: float
    uplink_mbps: float
    latency_s: float

    @property
    def sustained_flops_per_s(self) -> float:
        return self.flops_per_s * self.efficiency


def device_classes(custom: Mapping[str, Mapping[str, Any]]) -> dict[str, DeviceClass]:
    """Built-in device classes with ``system.device_classes`` added (a name may replace a built-in)."""
    classes = dict(DEVICE_CLASSES)
    for name, spec in custom.items():
        flops = spec["flops_per_s"]
        classes[name] = DeviceClass(
            flops_per_s=dict(flops) if isinstance(flops, Mapping) else {"fp32": float(flops)},
            memory_gb=float(spec["memory_gb"]),
            efficiency=float(spec.get("efficiency", CPU_EFFICIENCY)),
            availability=float(spec.get("availability", 1.0)),
        )
    return classes


def network_classes(custom: Mapping[str, Mapping[str, Any]]) -> dict[str, NetworkClass]:
    """Built-in network classes with ``system.network_classes`` added."""
    classes = dict(NETWORK_CLASSES)
    for name, spec in custom.items():
        classes[name] = NetworkClass(
            downlink_mbps=float(spec["downlink_mbps"]),
            uplink_mbps=float(spec["uplink_mbps"]),
            latency_s=float(spec["latency_s"]),
        )
    return classes


def split_profile(name: str) -> tuple[str, str]:
    device, separator, network = name.partition(PROFILE_SEPARATOR)
    if not separator or not device or not network:
        raise ValueError(f"{name!r} is not '<device>{PROFILE_SEPARATOR}<network>' (e.g. 'jetson_orin_nano@wifi')")
    return device, network


def resolve_profile(
    name: str,
    precision: str,
    devices: Mapping[str, DeviceClass],
    networks: Mapping[str, NetworkClass],
    efficiency: Optional[float] = None,
) -> Profile:
    """The numbers behind a profile name at ``precision``; ``efficiency`` overrides the class's."""
    device_name, network_name = split_profile(name)
    if device_name not in devices:
        raise KeyError(f"device class {device_name!r} in {name!r} is unknown; choose one of {sorted(devices)}")
    if network_name not in networks:
        raise KeyError(f"network class {network_name!r} in {name!r} is unknown; choose one of {sorted(networks)}")
    device, network = devices[device_name], networks[network_name]
    return Profile(
        name=name,
        device=device_name,
        network=network_name,
        flops_per_s=device.peak(precision),
        efficiency=device.efficiency if efficiency is None else efficiency,
        memory_gb=device.memory_gb,
        availability=device.availability,
        downlink_mbps=network.downlink_mbps,
        uplink_mbps=network.uplink_mbps,
        latency_s=network.latency_s,
    )


def system_problems(cfg: ExperimentConfig) -> list[str]:
    """What is wrong with ``system.*`` (named, with the fix), before any work starts."""
    system = cfg.system
    if not system.clock:
        return (
            []
            if cfg.federation.deadline_s is None
            else [
                "federation.deadline_s is set but system.clock=false: the deadline is simulated time; turn the clock on"
            ]
        )
    problems = []
    for field_name, custom, needed in (
        ("system.device_classes", system.device_classes, ("flops_per_s", "memory_gb")),
        ("system.network_classes", system.network_classes, ("downlink_mbps", "uplink_mbps", "latency_s")),
    ):
        for name, spec in custom.items():
            missing = [k for k in needed if k not in spec]
            if missing:
                problems.append(f"{field_name}.{name}: missing {missing} (needs {list(needed)})")
    if problems:
        return problems
    try:
        devices, networks = device_classes(system.device_classes), network_classes(system.network_classes)
    except (TypeError, ValueError) as exc:
        return [f"system.device_classes / system.network_classes: not numbers ({exc})"]
    for name, device in devices.items():
        if "fp32" not in device.flops_per_s or min(device.flops_per_s.values()) <= 0 or device.memory_gb <= 0:
            problems.append(
                f"system.device_classes.{name}: flops_per_s needs a positive fp32 rate (a number, or a mapping "
                "with an fp32 key) and memory_gb must be positive"
            )
        if not 0 < device.efficiency <= 1 or not 0 < device.availability <= 1:
            problems.append(f"system.device_classes.{name}: efficiency and availability must be in (0, 1]")
    for name, network in networks.items():
        if network.downlink_mbps <= 0 or network.uplink_mbps <= 0 or network.latency_s < 0:
            problems.append(
                f"system.network_classes.{name}: downlink_mbps and uplink_mbps must be positive, latency_s >= 0"
            )
    if problems:
        return problems
    names: Iterable[str] = system.devices if isinstance(system.devices, list) else system.devices.keys()
    if isinstance(system.devices, list) and len(system.devices) != cfg.data.num_clients:
        problems.append(
            f"system.devices lists {len(system.devices)} profiles for data.num_clients={cfg.data.num_clients}: give "
            "one per client, or a mapping of profile -> proportion"
        )
    if isinstance(system.devices, dict):
        if not system.devices:
            problems.append("system.devices is empty: name at least one profile, e.g. {jetson_orin_nano@wifi: 1}")
        if any(v < 0 for v in system.devices.values()) or (system.devices and sum(system.devices.values()) <= 0):
            problems.append("system.devices proportions must be >= 0 and not all 0")
    for name in sorted(set(names)):
        try:
            resolve_profile(name, cfg.runtime.precision, devices, networks, system.efficiency)
        except (KeyError, ValueError) as exc:
            problems.append(f"system.devices: {exc.args[0]}")
    return problems
