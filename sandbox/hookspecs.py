"""Hook specifications: one registration hook per component kind.

Every hook follows the same pattern. It receives a ``register`` callback and calls it once per
component it provides::

    from sandbox.api import hookimpl

    @hookimpl
    def sandbox_register_perturbations(register):
        register("shake", Shake)

``register(name, factory, description=None)`` records ``factory`` (a class or function) under
``name``. A recipe then names the component and sets options: ``[perturbation] name = "shake"``
followed by keyword arguments of ``factory``. The keyword parameters of ``factory`` are the
options (their defaults become the recipe's defaults, their annotations the expected types);
the host passes some context arguments itself, listed per hook below. Two plugins registering one
name in one kind is an error naming both. No hook is ``firstresult``: all implementations run.
"""

from __future__ import annotations

import pluggy

from sandbox.api import PROJECT_NAME, Register

hookspec = pluggy.HookspecMarker(PROJECT_NAME)


@hookspec
def sandbox_register_backbones(register: Register) -> None:
    """Register encoders for the segmentation model.

    The factory returns a :class:`sandbox.api.Backbone`: ``forward(images)`` gives
    ``(low_level, high_level)`` features at strides 4 and ``output_stride``. The host passes no
    context arguments; every parameter is a recipe option of the ``[backbone]`` table.
    """


@hookspec
def sandbox_register_density_estimators(register: Register) -> None:
    """Register density estimators over per-pixel features (flows, mixtures).

    The factory returns a :class:`sandbox.api.DensityEstimator`. The host passes
    ``feature_dim`` (int, the embedding width), ``num_classes`` (int) and ``total_steps`` (int,
    the number of ``fit_step`` calls planned, for schedules); the other parameters are options of
    the ``[density]`` table.
    """


@hookspec
def sandbox_register_perturbations(register: Register) -> None:
    """Register feature perturbations applied to the unlabeled strong view.

    The factory returns a :class:`sandbox.api.Perturbation`; every parameter is an option of the
    ``[perturbation]`` table. A perturbation with ``uses_density = True`` gets the online density
    estimator in its :class:`sandbox.api.PerturbationContext`.
    """


@hookspec
def sandbox_register_consistency_losses(register: Register) -> None:
    """Register losses between student predictions and teacher pseudo-labels.

    The factory returns a :class:`sandbox.api.ConsistencyLoss`; every parameter is an option of
    the ``[consistency.strong]`` or ``[consistency.perturbed]`` table.
    """


@hookspec
def sandbox_register_datasets(register: Register) -> None:
    """Register datasets.

    The factory returns a :class:`sandbox.api.SegmentationSource` (labeled, unlabeled and val
    parts with class names); every parameter is an option of the ``[dataset]`` table.
    """


@hookspec
def sandbox_register_networks(register: Register) -> None:
    """Register segmentation networks (the ``[model]`` table chooses one by ``name``).

    The factory returns a :class:`sandbox.api.SegmentationNetwork`: ``encode(images)`` gives the
    features the perturbation moves (the classifier's input), ``classifier`` and ``final`` map
    them to the embedding and the class scores. The host passes ``num_classes`` (int) and
    ``build_backbone`` (a function returning the recipe's ``[backbone]``, for networks built on
    one); a factory declares the ones it uses. Every other parameter is an option of ``[model]``.
    """
