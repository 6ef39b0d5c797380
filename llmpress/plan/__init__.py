"""Budgeted compression: measure each layer's sensitivity, choose bits per layer to meet a
budget (``allocate``), predict a run's resources before it starts, and compare recipes."""

from llmpress.plan.allocate import BudgetError, Plan, allocate, uniform
from llmpress.plan.sensitivity import Option, Sensitivity, Unit, measure

__all__ = ["BudgetError", "Plan", "allocate", "uniform", "Option", "Sensitivity", "Unit", "measure"]
