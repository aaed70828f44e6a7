# sushy-emulator's configuration for a lab VM (sushy-tools 2.2.0, pinned: this replaces methods
# of its fake driver). The fake driver's power and boot-device methods call chassis-control, so
# the PowerState a client reads is the VM's real state and a Pxe override applies to the next
# start only. Everything else (the Redfish tree, basic auth, TLS) is the emulator's own.
import os
import subprocess

from sushy_tools import error
from sushy_tools.emulator.resources.systems import fakedriver

_CONTROL = os.environ["LAB_CHASSIS_CONTROL"]
_DIR = os.environ["LAB_CHASSIS_DIR"]


def _chassis(*args):
    return subprocess.run([_CONTROL, _DIR, *args], check=True, capture_output=True,
                          text=True, timeout=10).stdout


def _get_power_state(self, identity):
    self._get(identity)
    return "On" if "power:1" in _chassis("get", "power") else "Off"


def _set_power_state(self, identity, state):
    self._get(identity)
    if state in ("On", "ForceOn"):
        _chassis("set", "power", "1")
    elif state in ("ForceOff", "GracefulShutdown"):
        _chassis("set", "power", "0")
    elif state in ("ForceRestart", "GracefulRestart", "PowerCycle"):
        _chassis("set", "reset", "1")
    else:
        raise error.NotSupportedError(f"Power state {state} is not supported")


def _get_boot_device(self, identity):
    self._get(identity)
    return "Pxe" if "boot:pxe" in _chassis("get", "boot") else "Hdd"


def _set_boot_device(self, identity, boot_source):
    self._get(identity)
    _chassis("set", "boot", "pxe" if boot_source == "Pxe" else "none")


fakedriver.FakeDriver.get_power_state = _get_power_state
fakedriver.FakeDriver.set_power_state = _set_power_state
fakedriver.FakeDriver.get_boot_device = _get_boot_device
fakedriver.FakeDriver.set_boot_device = _set_boot_device

SUSHY_EMULATOR_LISTEN_IP = os.environ["LAB_LISTEN_IP"]
SUSHY_EMULATOR_LISTEN_PORT = int(os.environ["LAB_LISTEN_PORT"])
SUSHY_EMULATOR_SSL_CERT = os.environ["LAB_TLS_CERT"]
SUSHY_EMULATOR_SSL_KEY = os.environ["LAB_TLS_KEY"]
SUSHY_EMULATOR_AUTH_FILE = os.environ["LAB_HTPASSWD"]
SUSHY_EMULATOR_STATE_DIR = os.path.join(_DIR, "sushy-state")
SUSHY_EMULATOR_FAKE_DRIVER = True
SUSHY_EMULATOR_FAKE_SYSTEMS = [{
    "uuid": os.environ["LAB_SYSTEM_UUID"],
    "name": "vm",
    "power_state": "Off",
    "nics": [{"mac": os.environ["LAB_SYSTEM_MAC"], "ip": "0.0.0.0"}],
}]
