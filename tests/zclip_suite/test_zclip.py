import pytest
import torch
import torch.nn as nn
from torch.optim import SGD

from zclip_shim import ZClip  # agclip: was "from zclip import ZClip"


class SimpleModel(nn.Module):
    """A simple model for testing ZClip."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(10, 2)

    def forward(self, x):
        return self.linear(x)


class TestZClip:
    """Test suite for ZClip gradient clipping mechanism."""

    @pytest.fixture
    def setup_model(self):
        """Set up a simple model and optimizer for testing."""
        torch.manual_seed(42)  # For reproducibility
        model = SimpleModel()
        optimizer = SGD(model.parameters(), lr=0.01)
        return model, optimizer

    @pytest.fixture
    def setup_inputs(self):
        """Create input data for testing."""
        torch.manual_seed(42)  # For reproducibility
        x = torch.randn(5, 10)
        y = torch.tensor([0, 1, 0, 1, 0])
        return x, y

    def test_init_custom_values(self):
        """Test that ZClip initializes with custom values."""
        zclip = ZClip(
            alpha=0.9,
            z_thresh=3.0,
            max_grad_norm=2.0,
            eps=1e-8,
            warmup_steps=50,
            mode="percentile",
            clip_factor=0.8,
            skip_update_on_spike=True
        )
        
        assert zclip.alpha == 0.9
        assert zclip.z_thresh == 3.0
        assert zclip.max_grad_norm == 2.0
        assert zclip.eps == 1e-8
        assert zclip.warmup_steps == 50
        assert zclip.mode == "percentile"
        assert zclip.clip_option is None  # clip_option is ignored in percentile mode
        assert zclip.clip_factor == 0.8
        assert zclip.skip_update_on_spike is True

    def test_invalid_mode(self):
        """Test that ZClip raises ValueError for invalid mode."""
        with pytest.raises(ValueError, match="mode must be either 'zscore' or 'percentile'"):
            ZClip(mode="invalid_mode")

    def test_invalid_clip_option(self):
        """Test that ZClip raises AssertionError for invalid clip_option in zscore mode."""
        with pytest.raises(AssertionError, match="For zscore mode, clip_option must be either 'mean' or 'adaptive_scaling'"):
            ZClip(mode="zscore", clip_option="invalid_option")

    def test_warmup_phase(self, setup_model, setup_inputs):
        """Test that during warmup, ZClip collects gradient norms without clipping."""
        model, optimizer = setup_model
        x, y = setup_inputs
        zclip = ZClip(warmup_steps=5)
        
        # Loss function
        criterion = nn.CrossEntropyLoss()
        
        # Simulate training for warmup_steps
        for i in range(5):
            optimizer.zero_grad()
            outputs = model(x)
            loss = criterion(outputs, y)
            loss.backward()
            
            norm = zclip.step(model)
            
            # During warmup steps before the final one, ZClip should not be initialized
            if i < 4:
                assert not zclip.initialized
                assert len(zclip.buffer) == i + 1
            else:
                # On the final warmup step, ZClip should be initialized
                assert zclip.initialized
                assert len(zclip.buffer) == 0
                assert zclip.mean is not None
                assert zclip.var is not None
            
            assert norm > 0  # Check that norm is calculated
            optimizer.step()

    def test_zscore_clipping(self, setup_model, setup_inputs):
        """Test ZClip with zscore mode."""
        model, optimizer = setup_model
        x, y = setup_inputs
        
        # Initialize ZClip with pre-defined stats to skip warmup
        zclip = ZClip(mode="zscore", z_thresh=2.0)
        zclip.mean = 1.0
        zclip.var = 0.25  # std = 0.5
        zclip.initialized = True
        
        criterion = nn.CrossEntropyLoss()
        
        # Normal update
        optimizer.zero_grad()
        outputs = model(x)
        loss = criterion(outputs, y)
        loss.backward()
        
        # Override _compute_grad_norm to return a value exceeding the threshold
        original_compute_norm = zclip._compute_grad_norm
        zclip._compute_grad_norm = lambda m: 3.0  # This should trigger clipping (z-score = 4.0)
        
        norm = zclip.step(model)
        
        # Restore original method
        zclip._compute_grad_norm = original_compute_norm
        
        # Check that normalization was applied
        assert norm == 3.0  # Should be the value we mocked
        assert zclip.mean != 1.0  # Mean should be updated

    def test_percentile_clipping(self, setup_model, setup_inputs):
        """Test ZClip with percentile mode."""
        model, optimizer = setup_model
        x, y = setup_inputs
        
        # Initialize ZClip with pre-defined stats to skip warmup
        zclip = ZClip(mode="percentile", z_thresh=2.0)
        zclip.mean = 1.0
        zclip.var = 0.25  # std = 0.5
        zclip.initialized = True
        
        criterion = nn.CrossEntropyLoss()
        
        # Normal update
        optimizer.zero_grad()
        outputs = model(x)
        loss = criterion(outputs, y)
        loss.backward()
        
        # Override _compute_grad_norm to return a value exceeding the threshold
        original_compute_norm = zclip._compute_grad_norm
        # In percentile mode, threshold is mean + z_thresh * std = 1.0 + 2.0 * 0.5 = 2.0
        zclip._compute_grad_norm = lambda m: 3.0  # This should trigger clipping
        
        norm = zclip.step(model)
        
        # Restore original method
        zclip._compute_grad_norm = original_compute_norm
        
        # Check that normalization was applied
        assert norm == 3.0  # Should be the value we mocked
        # Mean should be updated with the clipped value (2.0)
        assert zclip.mean != 1.0

    def test_skip_update_on_spike(self, setup_model, setup_inputs):
        """Test that ZClip skips EMA update when skip_update_on_spike is True."""
        model, optimizer = setup_model
        x, y = setup_inputs
        
        # Initialize ZClip with pre-defined stats to skip warmup
        zclip = ZClip(mode="zscore", z_thresh=2.0, skip_update_on_spike=True)
        zclip.mean = 1.0
        zclip.var = 0.25  # std = 0.5
        zclip.initialized = True
        
        criterion = nn.CrossEntropyLoss()
        
        # Normal update
        optimizer.zero_grad()
        outputs = model(x)
        loss = criterion(outputs, y)
        loss.backward()
        
        # Store original mean
        original_mean = zclip.mean
        
        # Override _compute_grad_norm to return a spike value
        original_compute_norm = zclip._compute_grad_norm
        zclip._compute_grad_norm = lambda m: 3.0  # This should trigger clipping (z-score = 4.0)
        
        # Override _compute_clip_val to always return a value (simulating spike detection)
        original_compute_clip_val = zclip._compute_clip_val
        zclip._compute_clip_val = lambda g: 2.0  # This ensures we hit the skip condition
        
        norm = zclip.step(model)
        
        # Restore original methods
        zclip._compute_grad_norm = original_compute_norm
        zclip._compute_clip_val = original_compute_clip_val
        
        # Mean should NOT be updated if skip_update_on_spike is True
        assert zclip.mean == original_mean

    def test_in_place_clipping(self, setup_model):
        """Test that gradients are properly clipped in place."""
        model, _ = setup_model
        
        # Set gradients to a known value for all parameters
        for param in model.parameters():
            param.grad = torch.ones_like(param)
        
        zclip = ZClip()
        
        # Apply clipping with global_norm > max_global_norm
        zclip.apply_in_place_clipping(model, global_norm=2.0, max_global_norm=1.0)
        
        # Check that all gradients were scaled by 0.5
        for param in model.parameters():
            assert torch.allclose(param.grad, torch.ones_like(param) * 0.5)
    
    def test_adaptive_scaling_threshold(self):
        """Test that adaptive scaling computes the correct threshold."""
        zclip = ZClip(mode="zscore", clip_option="adaptive_scaling", z_thresh=2.0)
        zclip.mean = 1.0
        zclip.var = 0.25  # std = 0.5
        zclip.initialized = True
        
        # With z_thresh=2.0, the zscore for grad_norm=3.0 is 4.0
        # The adaptive threshold should be mean + (z_thresh * std) / (z/z_thresh) * clip_factor
        # = 1.0 + (2.0 * 0.5) / (4.0/2.0) * 1.0 = 1.0 + 1.0 / 2.0 = 1.5
        clip_val = zclip._compute_clip_val(3.0)
        
        # The actual formula in the code includes clip_factor and may have small floating point differences
        # Assert with a wider tolerance to accommodate actual implementation
        # assert abs(clip_val - 1.5) < 0.3
        # TODO: Review and bring back.

    def test_mean_threshold(self):
        """Test that mean option clips to the EMA mean."""
        zclip = ZClip(mode="zscore", clip_option="mean")
        zclip.mean = 1.0
        zclip.var = 0.25
        zclip.initialized = True
        
        # With z_thresh=2.5 (default), the zscore for grad_norm=3.0 is 4.0
        # Since z > z_thresh and clip_option is "mean", it should clip to the mean (1.0)
        clip_val = zclip._compute_clip_val(3.0)
        
        assert pytest.approx(clip_val, 0.01) == 1.0


if __name__ == "__main__":
    pytest.main()
