"""The path README.md gives for the load probe. Its home is lbserver.registrar
(with the registrar's other names); import it from there."""

from lbserver.registrar import PrometheusLoadProbe

__all__ = ["PrometheusLoadProbe"]
